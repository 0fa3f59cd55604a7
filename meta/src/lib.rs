//! Cluster metadata store (placeholder).
