"""Privacy mechanisms and accounting (record and institution level); the ledger and its report."""
