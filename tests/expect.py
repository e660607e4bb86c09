"""Expect-test base class that works in accept mode on torch 2.11 and 2.13.

torch 2.13's ``torch._dynamo.test_case.TestCase.assertExpectedInline`` forgets to
pass ``skip + 1``, so ``EXPECTTEST_ACCEPT=1`` would rewrite torch's own file; we call
expecttest's implementation directly with the right frame offset.
"""

from __future__ import annotations

import expecttest


class ExpectTestCase(expecttest.TestCase):
    def assertExpectedInline(self, actual, expect, skip=0, **kwargs):  # noqa: N802 (unittest style)
        return expecttest.TestCase.assertExpectedInline(self, actual, expect, skip=skip + 1, **kwargs)
