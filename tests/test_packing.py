"""`market.packing`: what crosses a process boundary comes back exactly as it left."""
from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from market.packing import pack, unpack
from market.types import LegQuote, SourceQuote

ARRAYS = hnp.arrays(
    dtype=st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes(),
                    hnp.complex_number_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes()),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes() and bool(b.flags.writeable))
    return type(a) is type(b) and pickle.dumps(a) == pickle.dumps(b)


@settings(max_examples=200, deadline=None)
@given(array=ARRAYS)
def test_an_array_comes_back_bit_for_bit_and_writable(array: np.ndarray) -> None:
    """Any dtype (NaNs, byte order and strings included) and shape, 0-d and empty too."""
    assert _same(array, unpack(pickle.loads(pickle.dumps(pack(array)))))


@settings(max_examples=100, deadline=None)
@given(price=st.one_of(ARRAYS, st.text(), st.none(), st.lists(st.floats(allow_nan=False)), st.just({"price": "cheap"})),
       order_idx=ARRAYS)
def test_a_quote_pickles_exactly_whatever_a_bidder_put_in_it(price: Any, order_idx: np.ndarray) -> None:
    """A garbage bidder's quote must reach the auctioneer's validation as it was sent, not tidied up."""
    for quote in (SourceQuote("wh", order_idx, price, np.zeros(2), 0.9, 1),
                  LegQuote("riders", order_idx, np.zeros(1, dtype=np.int64), price, np.ones(1), np.ones(1), 0.8, 2)):
        back = pickle.loads(pickle.dumps(quote, protocol=pickle.HIGHEST_PROTOCOL))
        assert type(back) is type(quote)
        for name in quote.__slots__:
            assert _same(getattr(quote, name), getattr(back, name)), name


def test_an_object_array_and_a_look_alike_tuple_are_left_as_they_are() -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    assert pack(objects) is objects
    look_alike = ("\x00bidhive-other", 1)
    assert unpack(look_alike) is look_alike and unpack(()) == ()
