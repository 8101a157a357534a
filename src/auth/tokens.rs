//! JWTs (HS256). The secret comes from `JWT_SECRET`, or in the embedded default is generated once
//! and kept in the data dir, so tokens survive restarts of a laptop install.

use std::path::Path;
use std::time::Duration;

use cochat_actors::ids::UserId;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Display name, so the socket needs no store lookup to name its user.
    pub name: String,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl TokenKeys {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl,
        }
    }

    pub fn issue(&self, user: &UserId, name: &str) -> Result<String, String> {
        let now = now_secs();
        let claims = Claims {
            sub: user.0.clone(),
            name: name.to_owned(),
            iat: now,
            exp: now + self.ttl.as_secs().max(1),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(|e| e.to_string())
    }

    /// Checks signature, algorithm and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| e.to_string())
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The configured secret, or the one kept in `<data_dir>/jwt_secret` (created on first start).
pub fn load_or_generate_secret(
    configured: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<Vec<u8>> {
    if let Some(secret) = configured {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = data_dir.join("jwt_secret");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        if existing.len() >= 32 {
            tracing::warn!(path = %path.display(), "JWT_SECRET is not set: using the secret kept in the data dir (set JWT_SECRET in production)");
            return Ok(existing.as_bytes().to_vec());
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let secret: String = (0..64)
        .map(|_| format!("{:x}", rand::random::<u8>() % 16))
        .collect();
    write_private(&path, &secret)?;
    tracing::warn!(path = %path.display(), "JWT_SECRET is not set: generated a secret and kept it in the data dir (set JWT_SECRET in production)");
    Ok(secret.into_bytes())
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_their_secret_only_and_expire() {
        let keys = TokenKeys::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let token = keys
            .issue(&UserId::from("u1"), "Ada")
            .expect("issuing works");
        let claims = keys.verify(&token).expect("own token verifies");
        assert_eq!((claims.sub.as_str(), claims.name.as_str()), ("u1", "Ada"));

        let other = TokenKeys::new(b"another secret another secret 12", Duration::from_secs(60));
        assert!(other.verify(&token).is_err());

        let expired = Claims {
            sub: "u1".into(),
            name: "Ada".into(),
            iat: 1,
            exp: 2,
        };
        let old =
            encode(&Header::new(Algorithm::HS256), &expired, &keys.encoding).expect("encodes");
        assert!(keys.verify(&old).is_err());
    }

    #[test]
    fn a_generated_secret_is_kept_and_reused() {
        let dir =
            std::env::temp_dir().join(format!("cochat-secret-{}", uuid::Uuid::new_v4().simple()));
        let first = load_or_generate_secret(None, &dir).expect("generates");
        let second = load_or_generate_secret(None, &dir).expect("reads back");
        assert_eq!(first, second);
        assert_eq!(
            load_or_generate_secret(Some("given"), &dir).expect("given"),
            b"given".to_vec()
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
