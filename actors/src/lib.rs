//! cochat's actors and everything they speak: the `Room` actor and its registry, their typed
//! messages, the wire protocol enums, the group committer, and the ports (traits) the process
//! fills with real drivers. This crate builds without actix-web, Postgres, Redis or S3.

pub mod agent;
pub mod bus;
pub mod commit;
pub mod error;
pub mod event;
pub mod fakes;
pub mod ids;
pub mod llm;
pub mod ports;
pub mod protocol;
pub mod registry;
pub mod room;
pub mod time;
