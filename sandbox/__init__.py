"""The embedded default estate: real servers on loopback for drills and tests."""
