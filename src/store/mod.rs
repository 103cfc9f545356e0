//! The backup store: everything datavault keeps on the drive (or in a bucket), and the one
//! module that knows how it is laid out.
//!
//! [`backend`] is the storage itself, reduced to list/read/create/remove so that the USB
//! drive, an S3 bucket and an in-memory test store are interchangeable. [`dedup`] is the
//! deduplicated snapshot store built on it (#9).

pub mod backend;
pub mod dedup;
