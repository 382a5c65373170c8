//! The token cache: knows neither Klavi nor HTTP.
//!
//! A [`source::TokenSource`] says where tokens come from; the
//! [`refresher`] is the one task per profile that asks it, on the
//! [`policy`]'s schedule or when a waiting handler demands; the [`store`]
//! holds the [`token::Token`] for every consumer and runs the demand
//! protocol the handlers wait on.

pub mod digests;
pub mod policy;
pub mod pool;
pub mod refresher;
pub mod source;
pub mod store;
pub mod token;
