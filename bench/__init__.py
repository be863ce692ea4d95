"""Side-by-side benchmark of konpro-bridge against a naive bridge, Flask + pika and the ceilings."""
