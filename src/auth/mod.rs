//! Authentication: argon2id password hashes, HS256 JWTs, and the extractor handlers use.

mod extract;
mod hasher;
mod password;
mod tokens;

pub use extract::{bearer_token, bearer_token_in, AuthUser};
pub use hasher::{Hasher, HasherError};
pub use password::{hash_password, verify_password};
pub use tokens::{load_or_generate_secret, Claims, TokenKeys};
