//! Local throwaway PostgreSQL clusters (being written).
