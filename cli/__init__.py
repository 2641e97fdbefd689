"""mmctl and the demo driver."""
