"""Exports of mt4ssl checkpoints to other toolkits' formats (`mt4ssl export <kind>`)."""
