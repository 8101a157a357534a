//! Store drivers (SQLite embedded default, Postgres at scale) behind `cochat_actors::ports::Store`.
//! `open` picks the driver from the URL and runs its migrations before handing it out.

pub mod postgres;
pub mod shared;
pub mod sqlite;

use std::sync::Arc;

use cochat_actors::error::StoreError;
use cochat_actors::ports::Store;

/// Opens (and migrates) the store named by `url`:
/// `sqlite://<path>`, `sqlite::memory:`, or `postgres://...` / `postgresql://...`.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url == "sqlite::memory:" {
        return Ok(Arc::new(sqlite::SqliteStore::open_in_memory().await?));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Backend("sqlite:// needs a file path".into()));
        }
        return Ok(Arc::new(sqlite::SqliteStore::open(path).await?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(postgres::PostgresStore::connect(url).await?));
    }
    Err(StoreError::Backend(format!(
        "unsupported store url (expected sqlite://, sqlite::memory: or postgres://): {}",
        redact_url(url)
    )))
}

/// Keeps credentials out of logs and error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://***@h/db"
        );
        assert_eq!(
            redact_url("sqlite://./data/cochat.db"),
            "sqlite://./data/cochat.db"
        );
    }

    #[tokio::test]
    async fn dispatches_on_the_url() {
        let store = open("sqlite::memory:")
            .await
            .expect("in-memory sqlite opens");
        store.ping().await.expect("and answers");
        let dir =
            std::env::temp_dir().join(format!("cochat-open-{}", uuid::Uuid::new_v4().simple()));
        let url = format!("sqlite://{}", dir.join("a/b/cochat.db").display());
        open(&url)
            .await
            .expect("parent directories are created")
            .ping()
            .await
            .expect("ping");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(open("sqlite://").await.is_err());
        let Err(error) = open("mysql://user:pw@host/db").await else {
            panic!("mysql is not supported")
        };
        assert!(
            !error.to_string().contains("pw"),
            "passwords stay out of errors: {error}"
        );
    }
}
