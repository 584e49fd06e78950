"""The round protocol: what crosses the wire (message types, record keys and layouts) and the
aggregation rule both round paths share."""
