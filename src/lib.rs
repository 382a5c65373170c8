pub mod clock;
pub mod config;
pub mod error;
pub mod expiry;
pub mod policy;
pub mod secret;
