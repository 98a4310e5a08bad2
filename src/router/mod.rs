//! SQL text and routing: a lexer that finds words and statement boundaries without
//! allocating ([`lexer`]), the read/write classifier and transaction-start parsing
//! ([`classify`]), the routing policy — where a transaction runs, decided over a
//! snapshot of the hosts ([`route`]) —, which statements outlive their transaction
//! ([`session_state`]), single SQL-level PREPARE / EXECUTE / DEALLOCATE statements
//! ([`sql_prepare`]) and quoting for the SQL pgtide writes ([`quote`]).

pub mod classify;
pub mod lexer;
pub mod quote;
pub mod route;
pub mod session_state;
pub mod sql_prepare;
