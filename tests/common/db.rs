//! Test database provisioning: every integration test gets its own database and drops it after.
//!
//! - `TestDatabase::postgres()` creates a fresh `cochat_t_<hex>` database on the server named by
//!   `COCHAT_TEST_POSTGRES_URL` (else `DATABASE_URL` when it is a Postgres URL, else the local
//!   default). When no server answers, it returns `None` after printing `SKIPPED ...` — except in
//!   CI (`CI=true`), where a missing Postgres is a failure and it panics.
//! - `TestDatabase::sqlite()` gives a `sqlite://` URL inside a fresh temporary directory.
//!
//! Dropping a `TestDatabase` removes what it created.
#![allow(dead_code)] // each test crate compiles this module and uses a different part of it

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

enum Backing {
    Postgres { admin_url: String, name: String },
    Sqlite { dir: PathBuf },
}

/// A database that exists until this value is dropped.
pub struct TestDatabase {
    pub url: String,
    backing: Backing,
}

fn random_hex() -> String {
    let bytes: [u8; 8] = rand::thread_rng().gen();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Where the tests find a Postgres server with the right to create databases.
pub fn postgres_admin_url() -> String {
    if let Ok(url) = std::env::var("COCHAT_TEST_POSTGRES_URL") {
        if !url.trim().is_empty() {
            return url;
        }
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if url.starts_with("postgres") {
            return url;
        }
    }
    DEFAULT_ADMIN_URL.to_owned()
}

/// The admin URL with its database replaced by `name` (URL form or `key=value` form).
fn with_database(admin_url: &str, name: &str) -> String {
    let Some(scheme_end) = admin_url.find("://") else {
        // key=value connection string: a later dbname overrides an earlier one
        return format!("{admin_url} dbname={name}");
    };
    let rest_start = scheme_end + 3;
    let rest = &admin_url[rest_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &admin_url[..rest_start + authority_end];
    let after = &rest[authority_end..];
    let query = after.find('?').map(|at| &after[at..]).unwrap_or("");
    format!("{authority}/{name}{query}")
}

/// Hides the password of a URL for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// tokio-postgres' `Display` stops at the kind ("error connecting to server"): add the causes.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn admin_connect(admin_url: &str) -> Result<tokio_postgres::Client, String> {
    let connecting = tokio_postgres::connect(admin_url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|error| with_causes(&error))?;
    tokio::spawn(async move {
        // The connection ends when the client is dropped; an error here only means it broke.
        let _ = connection.await;
    });
    Ok(client)
}

impl TestDatabase {
    /// A fresh, empty Postgres database, or `None` (skip) when no server is reachable outside CI.
    pub async fn postgres() -> Option<TestDatabase> {
        let admin_url = postgres_admin_url();
        let test = std::thread::current()
            .name()
            .unwrap_or("unnamed test")
            .to_owned();
        let client = match admin_connect(&admin_url).await {
            Ok(client) => client,
            Err(error) => {
                let url = redacted(&admin_url);
                if std::env::var("CI").map(|ci| ci == "true").unwrap_or(false) {
                    panic!(
                        "PostgreSQL is required in CI but {url} is unreachable ({error}); \
                         set COCHAT_TEST_POSTGRES_URL to a server that allows CREATE DATABASE"
                    );
                }
                eprintln!("SKIPPED (no PostgreSQL at {url}): {test} ({error})");
                return None;
            }
        };
        let name = format!("cochat_t_{}", random_hex());
        // The name is ours (hex digits only), so formatting it into the statement is safe.
        if let Err(error) = client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            panic!(
                "PostgreSQL at {} is reachable but CREATE DATABASE failed: {error}",
                redacted(&admin_url)
            );
        }
        Some(TestDatabase {
            url: with_database(&admin_url, &name),
            backing: Backing::Postgres { admin_url, name },
        })
    }

    /// A `sqlite://` URL to a database file in a fresh temporary directory.
    pub fn sqlite() -> TestDatabase {
        let dir = std::env::temp_dir().join(format!("cochat_t_{}", random_hex()));
        std::fs::create_dir_all(&dir).expect("the temporary directory is writable");
        let url = format!("sqlite://{}/cochat.db", dir.display());
        TestDatabase {
            url,
            backing: Backing::Sqlite { dir },
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backing, Backing::Postgres { .. })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Sqlite { dir } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Backing::Postgres { admin_url, name } => {
                let admin_url = admin_url.clone();
                let name = name.clone();
                // Drop cannot be async and may run inside (or outside) a runtime: do the work on
                // a separate thread with its own runtime, and wait for it so the database is gone
                // when the test ends.
                let dropping = std::thread::spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            eprintln!("could not drop test database {name}: {error}");
                            return;
                        }
                    };
                    runtime.block_on(async {
                        let result = match admin_connect(&admin_url).await {
                            Ok(client) => client
                                .batch_execute(&format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                ))
                                .await
                                .map_err(|error| with_causes(&error)),
                            Err(error) => Err(error),
                        };
                        if let Err(error) = result {
                            eprintln!("could not drop test database {name}: {error}");
                        }
                    });
                });
                // Never panic in Drop (it may run while unwinding): a failed drop is only logged.
                if dropping.join().is_err() {
                    eprintln!("dropping a test database panicked");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "x"),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            with_database("host=h user=u", "x"),
            "host=h user=u dbname=x"
        );
    }
}
