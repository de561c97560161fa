"""State: the audit log, config history and the database behind them (pipeline step 9)."""
