//! Where tokens go besides the HTTP routes (issue 13, in steps).
//!
//! - [`token_file`]: writing a file atomically, so a reader never sees it
//!   half-written (SPEC §4.4). Not wired yet: `token_file` is still
//!   refused by the configuration until the refresh task writes it, with
//!   retries and readiness.

pub mod token_file;
