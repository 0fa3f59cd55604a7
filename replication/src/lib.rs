//! Sans-I/O replication core (placeholder).
