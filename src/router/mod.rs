//! SQL text analysis. Today: a lexer that finds words and statement boundaries without
//! allocating, used to notice statements that change session state. The read/write
//! classifier and routing decisions of DESIGN.md will live here too.

pub mod classify;
pub mod lexer;
