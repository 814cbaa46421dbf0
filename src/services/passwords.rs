//! Password hashing with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes, 1 lane),
//! always on the blocking pool so a hash never stalls the async workers.

use std::sync::{Arc, OnceLock};

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use rand::rngs::OsRng;
use tokio::sync::Semaphore;

use crate::error::Error;

/// At most one Argon2 computation per core at a time: each holds 19 MiB, and more at once
/// would only add memory and latency, not throughput. Waiters are served first come, first served.
fn hashing_slots() -> Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
            Arc::new(Semaphore::new(cores))
        })
        .clone()
}

/// Runs `work` on the blocking pool once a hashing slot is free.
async fn with_hashing_slot<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let slot = hashing_slots()
        .acquire_owned()
        .await
        .map_err(Error::internal)?;
    // The slot moves into the blocking task: freed when the hash is done, even if the
    // request that wanted it was dropped meanwhile.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await?
}

/// Hashes a password with a fresh random salt, as a PHC string.
pub async fn hash(password: String) -> Result<String, Error> {
    with_hashing_slot(move || hash_blocking(&password)).await
}

/// Checks a password against a stored hash. With no stored hash (unknown user) it checks
/// against a dummy hash of the same cost and answers `false`, so both cases take as long.
pub async fn verify(password: String, stored: Option<String>) -> Result<bool, Error> {
    with_hashing_slot(move || {
        let phc = match &stored {
            Some(phc) => phc.as_str(),
            None => dummy_hash()?,
        };
        let parsed = PasswordHash::new(phc).map_err(Error::internal)?;
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(matches && stored.is_some())
    })
    .await
}

fn hash_blocking(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(Error::internal)
}

fn dummy_hash() -> Result<&'static str, Error> {
    static DUMMY: OnceLock<String> = OnceLock::new();
    if let Some(hash) = DUMMY.get() {
        return Ok(hash);
    }
    let hash = hash_blocking("not anyone's password")?;
    Ok(DUMMY.get_or_init(|| hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_is_argon2id_in_phc_format_and_verifies_only_its_password() {
        let phc = hash("pass123".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify("pass123".into(), Some(phc.clone())).await.unwrap());
        assert!(!verify("pass124".into(), Some(phc)).await.unwrap());
    }

    #[tokio::test]
    async fn an_unknown_user_never_verifies() {
        assert!(!verify("not anyone's password".into(), None).await.unwrap());
    }
}
