//! Shared test support: databases, the real server started in-process, and protocol clients.
#![allow(dead_code)] // each test crate uses a different part of it

pub mod client;
pub mod db;
pub mod fake_llm;
pub mod nginx;
pub mod process;
pub mod redis;
pub mod server;

/// Runs an async test body against SQLite and, where reachable, Postgres:
/// `both_backends!(name)` expects `async fn name(db: TestDatabase)` in the same file.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::db::TestDatabase::sqlite()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(db) = $crate::common::db::TestDatabase::postgres().await {
                        super::$name(db).await;
                    }
                }
            }
        )*
    };
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}
