//! Where tokens go besides the HTTP routes: the token file (SPEC §4.4).
//!
//! - [`token_file`]: writing a file atomically, so a reader never sees it
//!   half-written;
//! - [`writer`]: the task that keeps a profile's file equal to its
//!   servable token, with retries and readiness.

pub mod token_file;
pub mod writer;
