//! AI agents: provider clients (OpenAI-compatible streaming), presets, and the agent machinery.

pub mod presets;
pub mod provider;
