//! Password hashing with argon2id (the crate's defaults: 19 MiB, 2 passes). Hashing is CPU-heavy,
//! so callers run these on the hasher pool (`super::Hasher`).
//!
//! Each hash needs 19 MiB of working memory. Allocated afresh per call (as `Argon2::hash_password`
//! does), freed blocks got split in glibc's per-thread arenas by small allocations that outlived
//! the job, so each arena came to hold several of them: ~380 MiB resident after 100 sign-ups.
//! Instead each pool thread keeps one buffer for its whole life and reuses it. The pool has one
//! thread per core and only its threads keep a buffer, so at most cores x 19 MiB are ever held.

use std::cell::RefCell;

use argon2::password_hash::{
    self, rand_core::OsRng, Output, ParamsString, PasswordHash, PasswordVerifier, Salt, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use super::hasher;

/// New hashes are made with this algorithm and version and `Params::default()`, which is what
/// `Argon2::default()` (used before the buffer) made too.
const ALGORITHM: Algorithm = Algorithm::Argon2id;
const VERSION: Version = Version::V0x13;

thread_local! {
    /// This thread's argon2 working memory, grown on first use and kept until the thread ends.
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

fn argon2() -> Argon2<'static> {
    Argon2::new(ALGORITHM, VERSION, Params::default())
}

pub fn hash_password(password: &str) -> Result<String, String> {
    hash(password).map_err(|error| error.to_string())
}

fn hash(password: &str) -> password_hash::Result<String> {
    let argon2 = argon2();
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0; Salt::MAX_LENGTH];
    let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
    let output = compute(&argon2, password, salt_bytes, Params::DEFAULT_OUTPUT_LEN)?;
    // The same PHC string `Argon2::hash_password` builds: `$argon2id$v=19$m=..,t=..,p=..$salt$hash`.
    let hash = PasswordHash {
        algorithm: ALGORITHM.ident(),
        version: Some(VERSION.into()),
        params: ParamsString::try_from(argon2.params())?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// False for a wrong password and for a malformed stored hash alike.
pub fn verify_password(password: &str, stored: &str) -> bool {
    let Ok(hash) = PasswordHash::new(stored) else {
        return false;
    };
    let argon2 = argon2();
    if !is_reproducible(&argon2, &hash) {
        // Other parameters (older hashes, say): argon2 recomputes them in memory of its own.
        return argon2.verify_password(password.as_bytes(), &hash).is_ok();
    }
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let mut salt_bytes = [0; Salt::MAX_LENGTH];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    // `Output`'s `==` runs in constant time.
    compute(&argon2, password, salt_bytes, expected.len()).is_ok_and(|output| output == expected)
}

/// Whether `hash` was made with `argon2`'s algorithm, version and parameters, so that verifying it
/// can use this thread's buffer.
fn is_reproducible(argon2: &Argon2, hash: &PasswordHash) -> bool {
    let Ok(stored) = Params::try_from(hash) else {
        return false;
    };
    // Parameters read from a hash carry its length as `output_len`; ours leave it open.
    let ours = argon2.params();
    let ours = Params::new(
        ours.m_cost(),
        ours.t_cost(),
        ours.p_cost(),
        stored.output_len(),
    );
    hash.algorithm == ALGORITHM.ident()
        && hash.version == Some(VERSION.into())
        && ours.is_ok_and(|ours| ours == stored)
}

/// Hashes `password` into an output of `len` bytes, in the reusable working memory.
fn compute(
    argon2: &Argon2,
    password: &str,
    salt: &[u8],
    len: usize,
) -> password_hash::Result<Output> {
    Output::init_with(len, |output| {
        with_memory(argon2.params().block_count(), |memory| {
            argon2.hash_password_into_with_memory(password.as_bytes(), salt, output, memory)
        })?;
        Ok(())
    })
}

/// Lends `work` at least `blocks` blocks: this thread's buffer on a hasher pool thread, otherwise
/// (tests, or a one-off hash made elsewhere) a fresh one, so no other thread holds 19 MiB for life.
fn with_memory<T>(blocks: usize, work: impl FnOnce(&mut [Block]) -> T) -> T {
    if !hasher::on_pool_thread() {
        return work(&mut vec![Block::default(); blocks]);
    }
    MEMORY.with(|memory| {
        // Never borrowed twice: `work` does not come back here.
        let mut memory = memory.borrow_mut();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        work(&mut memory)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Hasher;
    use argon2::password_hash::PasswordHasher;

    /// Runs `check` directly and on a one-thread pool (twice, so the kept buffer is reused).
    async fn both_ways(check: fn()) {
        check();
        let pool = Hasher::new(1);
        for _ in 0..2 {
            pool.run(check).await.expect("the check passes on the pool");
        }
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        both_ways(|| {
            let hash = hash_password("correct horse").expect("hashing works");
            assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
            assert!(verify_password("correct horse", &hash));
            assert!(!verify_password("wrong horse", &hash));
            // What the code before the buffer used to verify accepts new hashes too.
            let parsed = PasswordHash::new(&hash).expect("a PHC string");
            assert!(is_reproducible(&argon2(), &parsed));
            assert!(Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok());
        })
        .await;
    }

    #[tokio::test]
    async fn hashes_stored_before_the_buffer_still_verify() {
        both_ways(|| {
            let salt = SaltString::generate(&mut OsRng);
            let old = Argon2::default()
                .hash_password(b"correct horse", &salt)
                .expect("hashing works")
                .to_string();
            let parsed = PasswordHash::new(&old).expect("a PHC string");
            assert!(is_reproducible(&argon2(), &parsed));
            assert!(verify_password("correct horse", &old));
            assert!(!verify_password("wrong horse", &old));
        })
        .await;
    }

    #[tokio::test]
    async fn other_parameters_verify_the_old_way() {
        both_ways(|| {
            let params = Params::new(8192, 1, 1, None).expect("valid parameters");
            let salt = SaltString::generate(&mut OsRng);
            let other = Argon2::new(ALGORITHM, VERSION, params)
                .hash_password(b"correct horse", &salt)
                .expect("hashing works")
                .to_string();
            assert!(other.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"));
            let parsed = PasswordHash::new(&other).expect("a PHC string");
            assert!(!is_reproducible(&argon2(), &parsed));
            assert!(verify_password("correct horse", &other));
            assert!(!verify_password("wrong horse", &other));
        })
        .await;
    }

    #[tokio::test]
    async fn malformed_hashes_do_not_verify() {
        both_ways(|| {
            let good = hash_password("correct horse").expect("hashing works");
            let (head, _) = good.rsplit_once('$').expect("a PHC string");
            for stored in [
                "",
                "not a hash",
                "$argon2id$v=19$m=19456,t=2,p=1",
                head,
                &format!("{head}$"),
                &format!("{head}$AAAA"),
                &format!("{head}$!!!notbase64!!!"),
                "$argon2id$v=19$m=19456,t=2,p=1$!!$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "$argon2id$v=99$m=19456,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "$scrypt$ln=16,r=8,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            ] {
                assert!(!verify_password("correct horse", stored), "{stored:?}");
            }
        })
        .await;
    }
}
