"""Usage billing: Segment track events from a warehouse to billing APIs, exactly once through a ledger."""
