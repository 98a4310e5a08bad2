//! Integration tests against real PostgreSQL (a primary and a streaming replica started by
//! [`harness`]). Each area of pgtide adds its own `mod` here.

mod harness;
mod protocol;
mod smoke;
