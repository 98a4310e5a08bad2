//! SQL text and routing: a lexer that finds words and statement boundaries without
//! allocating ([`lexer`]), the read/write classifier and transaction-start parsing
//! ([`classify`]), the routing policy — where a transaction runs, decided over a
//! snapshot of the hosts ([`route`]) — and quoting for the SQL pgtide writes ([`quote`]).

pub mod classify;
pub mod lexer;
pub mod quote;
pub mod route;
pub mod session_state;
