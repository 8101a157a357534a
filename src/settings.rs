//! Settings from the environment. Every setting has a default that works on a laptop; the names
//! are the ones operators write into manifests (README has the table).

use std::path::PathBuf;
use std::time::Duration;

use cochat_actors::agent::AiConfig;

use crate::ai::provider::ProviderConfig;

/// Limits a client is held to; all configurable.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest WebSocket text frame answered with an `error` (larger ones are still read up to
    /// four times this, then the socket is closed with 1009).
    pub max_frame_bytes: usize,
    /// Largest message text, in bytes of UTF-8.
    pub max_text_bytes: usize,
    /// Per-connection token bucket: frames per second, and the burst allowed.
    pub rate_per_s: f64,
    pub rate_burst: f64,
    /// Refused frames in a row before a connection counts as abusive and is closed.
    pub abuse_strikes: u32,
    /// Most events replayed on `subscribe`; older ones are paged over HTTP.
    pub replay_limit: i64,
    /// Largest JSON body accepted over HTTP.
    pub http_body_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub bind: String,
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; `None` means SQLite in the data dir.
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    /// Prefix of every Redis channel (several deployments or test runs can share one Redis).
    pub redis_prefix: String,
    /// `None`: generated once and kept in the data dir.
    pub jwt_secret: Option<String>,
    pub node_id: String,
    pub token_ttl: Duration,
    pub limits: Limits,
    pub heartbeat: Duration,
    pub client_timeout: Duration,
    /// Sockets are closed with 1012 at random points over this window on SIGTERM.
    pub drain_window: Duration,
    /// Frames a socket may fall behind its room before it is cut off as a slow consumer.
    pub room_buffer: usize,
    pub room_idle: Duration,
    /// Presence snapshots between nodes: how often they are sent, how long one counts.
    pub presence_interval: Duration,
    pub presence_ttl: Duration,
    /// How often an active room checks the log for events the bus lost (multi-node only; 0: off).
    pub resync_interval: Duration,
    /// Postgres connections per node.
    pub db_pool: usize,
    /// Parallel group-commit transactions (SQLite always uses one).
    pub store_writers: usize,
    pub store_batch: usize,
    pub json_logs: bool,
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
    /// The default agents' provider (`AI_PROVIDER`, `AI_BASE_URL`, ...); `None`: not configured.
    pub ai_provider: Option<ProviderConfig>,
    /// Context budget, tool steps, trigger and token budgets.
    pub ai: AiConfig,
}

impl Settings {
    /// The embedded defaults, as `cargo run` uses them.
    pub fn defaults() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            redis_url: None,
            redis_prefix: "cochat:".into(),
            jwt_secret: None,
            node_id: default_node_id(),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            limits: Limits {
                max_frame_bytes: 64 * 1024,
                max_text_bytes: 16 * 1024,
                rate_per_s: 20.0,
                rate_burst: 50.0,
                abuse_strikes: 50,
                replay_limit: 1000,
                http_body_bytes: 64 * 1024,
            },
            heartbeat: Duration::from_secs(15),
            client_timeout: Duration::from_secs(45),
            drain_window: Duration::from_secs(10),
            room_buffer: 4096,
            room_idle: Duration::from_secs(30),
            presence_interval: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(25),
            resync_interval: Duration::from_secs(10),
            db_pool: 16,
            store_writers: 2,
            store_batch: 512,
            json_logs: false,
            workers: 0,
            ai_provider: None,
            ai: AiConfig::default(),
        }
    }

    /// Defaults overridden by the process environment.
    pub fn from_env() -> Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Defaults overridden by `lookup(name)`; an unparsable value is an error naming the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut s = Self::defaults();
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        if let Some(v) = get("COCHAT_BIND") {
            s.bind = v;
        }
        if let Some(v) = get("COCHAT_DATA_DIR") {
            s.data_dir = PathBuf::from(v);
        }
        s.database_url = get("DATABASE_URL");
        s.redis_url = get("REDIS_URL");
        s.jwt_secret = get("JWT_SECRET");
        if let Some(v) = get("COCHAT_NODE_ID") {
            s.node_id = v;
        }
        let num = |name: &str| -> Result<Option<f64>, String> {
            match get(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .map(Some)
                    .ok_or_else(|| format!("{name}: expected a non-negative number, got {v:?}")),
            }
        };
        let secs = |name: &str, into: &mut Duration| -> Result<(), String> {
            if let Some(n) = num(name)? {
                *into = Duration::from_secs_f64(n);
            }
            Ok(())
        };
        secs("COCHAT_TOKEN_TTL_S", &mut s.token_ttl)?;
        secs("COCHAT_HEARTBEAT_S", &mut s.heartbeat)?;
        secs("COCHAT_CLIENT_TIMEOUT_S", &mut s.client_timeout)?;
        secs("COCHAT_DRAIN_WINDOW_S", &mut s.drain_window)?;
        secs("COCHAT_ROOM_IDLE_S", &mut s.room_idle)?;
        secs("COCHAT_PRESENCE_INTERVAL_S", &mut s.presence_interval)?;
        secs("COCHAT_PRESENCE_TTL_S", &mut s.presence_ttl)?;
        secs("COCHAT_RESYNC_S", &mut s.resync_interval)?;
        if let Some(v) = get("COCHAT_REDIS_PREFIX") {
            s.redis_prefix = v;
        }
        let l = &mut s.limits;
        if let Some(n) = num("COCHAT_MAX_FRAME_BYTES")? {
            l.max_frame_bytes = n as usize;
        }
        if let Some(n) = num("COCHAT_MAX_TEXT_BYTES")? {
            l.max_text_bytes = n as usize;
        }
        if let Some(n) = num("COCHAT_RATE_PER_S")? {
            l.rate_per_s = n;
        }
        if let Some(n) = num("COCHAT_RATE_BURST")? {
            l.rate_burst = n;
        }
        if let Some(n) = num("COCHAT_ABUSE_STRIKES")? {
            l.abuse_strikes = n as u32;
        }
        if let Some(n) = num("COCHAT_REPLAY_LIMIT")? {
            l.replay_limit = n as i64;
        }
        if let Some(n) = num("COCHAT_HTTP_BODY_BYTES")? {
            l.http_body_bytes = n as usize;
        }
        if let Some(n) = num("COCHAT_ROOM_BUFFER")? {
            s.room_buffer = n as usize;
        }
        if let Some(n) = num("COCHAT_DB_POOL")? {
            s.db_pool = (n as usize).max(1);
        }
        if let Some(n) = num("COCHAT_STORE_WRITERS")? {
            s.store_writers = (n as usize).max(1);
        }
        if let Some(n) = num("COCHAT_STORE_BATCH")? {
            s.store_batch = (n as usize).max(1);
        }
        if let Some(n) = num("COCHAT_WORKERS")? {
            s.workers = n as usize;
        }
        s.ai_provider = crate::ai::presets::provider_config(&lookup)?;
        let ai = &mut s.ai;
        if let Some(n) = num("COCHAT_AI_CONTEXT_TOKENS")? {
            ai.context_tokens = (n as usize).max(256);
        }
        if let Some(n) = num("COCHAT_AI_ANSWER_TOKENS")? {
            ai.answer_tokens = (n as u32).max(16);
        }
        if let Some(n) = num("COCHAT_AI_TOOL_STEPS")? {
            ai.tool_steps = n as usize;
        }
        if let Some(n) = num("COCHAT_AI_TRIGGERS_PER_MIN_USER")? {
            ai.triggers_per_min_user = n as u32;
        }
        if let Some(n) = num("COCHAT_AI_TRIGGERS_PER_MIN_ROOM")? {
            ai.triggers_per_min_room = n as u32;
        }
        if let Some(n) = num("COCHAT_AI_TOKENS_PER_DAY_USER")? {
            ai.tokens_per_day_user = n as u64;
        }
        if let Some(n) = num("COCHAT_AI_TOKENS_PER_DAY_ROOM")? {
            ai.tokens_per_day_room = n as u64;
        }
        if let Some(n) = num("COCHAT_AI_STALE_S")? {
            ai.stale_answer_after = Duration::from_secs_f64(n.max(1.0));
        }
        if let Some(v) = get("COCHAT_LOG_FORMAT") {
            s.json_logs = match v.as_str() {
                "json" => true,
                "text" => false,
                other => {
                    return Err(format!(
                        "COCHAT_LOG_FORMAT: expected text or json, got {other:?}"
                    ))
                }
            };
        }
        Ok(s)
    }

    /// The store URL in effect: `DATABASE_URL` (with `COCHAT_DB_POOL` as the Postgres pool size
    /// unless the URL names one), or the SQLite file in the data dir.
    pub fn store_url(&self) -> String {
        match &self.database_url {
            Some(url) if url.starts_with("postgres") && !url.contains("pool_size=") => {
                let separator = if url.contains('?') { '&' } else { '?' };
                format!("{url}{separator}pool_size={}", self.db_pool)
            }
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("cochat.db").display()),
        }
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    let suffix: u32 = rand::random::<u32>() % 0x10000;
    format!("{host}-{suffix:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_defaults_and_bad_numbers_name_the_variable() {
        let settings = Settings::from_lookup(|name| match name {
            "COCHAT_MAX_TEXT_BYTES" => Some("100".into()),
            "COCHAT_DRAIN_WINDOW_S" => Some("2.5".into()),
            _ => None,
        })
        .expect("valid values parse");
        assert_eq!(settings.limits.max_text_bytes, 100);
        assert_eq!(settings.drain_window, Duration::from_millis(2500));
        assert_eq!(settings.limits.max_frame_bytes, 64 * 1024);

        let error =
            Settings::from_lookup(|name| (name == "COCHAT_RATE_PER_S").then(|| "fast".to_owned()))
                .expect_err("a word is not a rate");
        assert!(error.contains("COCHAT_RATE_PER_S"), "{error}");
    }

    #[test]
    fn the_postgres_pool_size_comes_from_the_environment_unless_the_url_names_it() {
        let with = |url: &str| {
            let mut settings = Settings::defaults();
            settings.database_url = Some(url.to_owned());
            settings.db_pool = 4;
            settings.store_url()
        };
        assert_eq!(with("postgres://h/db"), "postgres://h/db?pool_size=4");
        assert_eq!(
            with("postgres://h/db?sslmode=disable"),
            "postgres://h/db?sslmode=disable&pool_size=4"
        );
        assert_eq!(
            with("postgres://h/db?pool_size=9"),
            "postgres://h/db?pool_size=9"
        );
    }

    #[test]
    fn sqlite_in_the_data_dir_is_the_default_store() {
        let settings = Settings::defaults();
        assert_eq!(settings.store_url(), "sqlite://./data/cochat.db");
    }
}
