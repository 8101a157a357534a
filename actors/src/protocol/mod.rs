//! The wire protocol v1: one tagged enum per direction (`type` is the tag). Names here are the
//! contract clients are written against; add variants and fields, never rename.

mod client;
mod server;

pub use client::{parse_client_frame, ClientFrame, ParsedFrame, CLIENT_FRAME_TYPES};
pub use server::{Presence, QueuedTrigger, ServerFrame, UsageReport};
