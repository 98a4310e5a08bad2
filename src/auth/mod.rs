//! Authentication (being written).
