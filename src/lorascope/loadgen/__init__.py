"""Load generation: seeded workloads (popularity, arrivals, lengths), the working-set model of a law,
and (later) the HTTP client and runner. Talks to servers over HTTP only: imports no engine code."""
