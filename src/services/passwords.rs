//! Password hashing with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes, 1 lane),
//! on threads of its own at a lower CPU priority, so a hash never stalls the async workers
//! nor takes a core from them, at most one per core at a time, each in a reused 19 MiB
//! working area.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    mpsc, Arc, Mutex, OnceLock,
};

use argon2::{
    password_hash::{self, Output, ParamsString, PasswordHash, Salt, SaltString},
    Algorithm, Argon2, Block, Params, Version,
};
use rand::rngs::OsRng;
use tokio::sync::{oneshot, Semaphore};

use crate::services::ServiceError as Error;

/// Where password hashes wait for a core. At most one Argon2 computation per core runs at
/// a time: each holds 19 MiB, and more at once would only add memory and latency, not
/// throughput. Waiters are served first come, first served, and only `queue_limit` may
/// wait: past that a request is turned away at once (`Busy`) rather than wait ever longer.
pub struct PasswordHasher {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue_limit: usize,
    threads: mpsc::Sender<HashingJob>,
}

type HashingJob = Box<dyn FnOnce() + Send>;

/// The niceness of the hashing threads. A hash takes about 18 ms of a core; at the
/// same priority as the async workers it takes its full share of the core from them, and
/// every other request waits for it (`/balance` p99 8 ms during a login burst, BENCHMARKS.md
/// issue 13). At 10 that p99 was still about 4 ms, one scheduler tick at 250 Hz, as if a
/// worker woken beside a hash waited for the tick; from 15 it is 1 to 2 ms. The price is
/// paid only when the core has nothing left over: with another process spinning on it, a
/// login takes about 0.7 s at 15 (0.25 s at 10, 1.6 s at 19, 9 s with `SCHED_IDLE`), and
/// runs at full speed when the core is free.
const HASHING_NICENESS: i32 = 15;

/// How long a client turned away for a full queue is asked to wait.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

impl PasswordHasher {
    pub fn new(queue_limit: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        Self {
            slots: Arc::new(Semaphore::new(cores)),
            waiting: AtomicUsize::new(0),
            queue_limit,
            threads: start_hashing_threads(cores),
        }
    }

    /// Hashes a password with a fresh random salt, as a PHC string.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn hash(&self, password: String) -> Result<String, Error> {
        self.with_slot(move || hash_blocking(&password)).await
    }

    /// Checks a password against a stored hash. With no stored hash (unknown user) it
    /// checks against a dummy hash of the same cost and answers `false`, so both cases
    /// take as long.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, Error> {
        self.with_slot(move || {
            let phc = match &stored {
                Some(phc) => phc.as_str(),
                None => dummy_hash()?,
            };
            let parsed = PasswordHash::new(phc).map_err(hashing)?;
            let matches = verify_blocking(&password, &parsed)?;
            Ok(matches && stored.is_some())
        })
        .await
    }

    /// Runs `work` on a hashing thread once a hashing slot is free.
    async fn with_slot<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let _waiting = self.join_queue()?;
                self.slots.clone().acquire_owned().await.map_err(hashing)?
            }
        };
        // The slot moves into the job: freed when the hash is done, even if the request
        // that wanted it was dropped meanwhile. The span goes along, so the hash's time
        // shows in the request's trace.
        let span = tracing::Span::current();
        let (answer, answered) = oneshot::channel();
        let job = move || {
            let _entered = span.enter();
            let _slot = slot;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|_| Err(hashing("password hashing panicked")));
            // The request may be gone; its answer is then not wanted.
            let _ = answer.send(outcome);
        };
        self.threads
            .send(Box::new(job))
            .map_err(|_| hashing("the hashing threads have stopped"))?;
        answered
            .await
            .map_err(|_| hashing("a hashing thread dropped its job"))?
    }

    /// A place in the queue, given back when dropped (served, or the request went away).
    fn join_queue(&self) -> Result<QueuePlace<'_>, Error> {
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        let place = QueuePlace(&self.waiting);
        if ahead >= self.queue_limit {
            return Err(Error::HashersBusy {
                retry_after_secs: BUSY_RETRY_AFTER_SECS,
            });
        }
        Ok(place)
    }
}

/// Starts `count` hashing threads taking jobs from the returned sender, at
/// [`HASHING_NICENESS`]; they end when the sender (the hasher) is dropped. Threads of their
/// own rather than tokio's blocking pool: a thread's priority can only be lowered, never
/// raised again without privileges, and the blocking pool also runs other work.
fn start_hashing_threads(count: usize) -> mpsc::Sender<HashingJob> {
    let (sender, jobs) = mpsc::channel::<HashingJob>();
    let jobs = Arc::new(Mutex::new(jobs));
    for n in 0..count {
        let jobs = jobs.clone();
        let started = std::thread::Builder::new()
            .name(format!("argon2-{n}"))
            .spawn(move || {
                lower_this_threads_priority();
                loop {
                    // The lock is held only while waiting: a job runs unlocked.
                    let job = jobs
                        .lock()
                        .map_err(drop)
                        .and_then(|jobs| jobs.recv().map_err(drop));
                    match job {
                        Ok(job) => job(),
                        Err(()) => return,
                    }
                }
            });
        if let Err(err) = started {
            tracing::error!(error = %err, "could not start a password hashing thread");
        }
    }
    sender
}

/// Raises the calling thread's niceness to [`HASHING_NICENESS`]. By hand, through `libc`:
/// Linux keeps a niceness per thread (`setpriority` on a thread id), which neither the
/// standard library nor tokio exposes. Elsewhere the thread keeps the normal priority.
// A thread's own niceness (`setpriority` on its thread id) has no safe wrapper in std,
// tokio or a maintained crate.
#[allow(unsafe_code)]
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: these calls only read or change the scheduling of the calling thread.
        // A process already nicer than that keeps its niceness: it is only ever raised.
        let failed = unsafe {
            let thread = libc::gettid() as libc::id_t;
            let current = libc::getpriority(libc::PRIO_PROCESS, thread);
            libc::setpriority(libc::PRIO_PROCESS, thread, current.max(HASHING_NICENESS)) != 0
        };
        if failed {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "password hashing runs at normal priority"
            );
        }
    }
}

/// A failure of the hashing itself, never of the password: a bug or a corrupt stored hash.
fn hashing(err: impl std::fmt::Display) -> Error {
    Error::Hashing(err.to_string())
}

struct QueuePlace<'a>(&'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn hash_blocking(password: &str) -> Result<String, Error> {
    let argon2 = Argon2::default();
    let salt = SaltString::generate(&mut OsRng);
    let output = compute(&argon2, password.as_bytes(), salt.as_salt()).map_err(hashing)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(argon2.params()).map_err(hashing)?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Whether `password` yields the output recorded in `phc`, under the parameters it names.
fn verify_blocking(password: &str, phc: &PasswordHash<'_>) -> Result<bool, Error> {
    let (Some(salt), Some(expected)) = (phc.salt, &phc.hash) else {
        return Err(hashing("stored password hash has no salt or output"));
    };
    let algorithm = Algorithm::try_from(phc.algorithm).map_err(hashing)?;
    let version = phc
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(hashing)?
        .unwrap_or_default();
    let params = Params::try_from(phc).map_err(hashing)?;
    let argon2 = Argon2::new(algorithm, version, params);
    let computed = compute(&argon2, password.as_bytes(), salt).map_err(hashing)?;
    // `Output`'s equality is constant-time.
    Ok(computed == *expected)
}

/// Argon2's output for `password` and `salt`, computed in pooled working memory: what
/// `PasswordHasher::hash_password` computes, without allocating 19 MiB each time (freed
/// areas that large pile up in the allocator's per-thread arenas).
fn compute(argon2: &Argon2<'_>, password: &[u8], salt: Salt<'_>) -> password_hash::Result<Output> {
    let mut salt_buffer = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buffer)?;
    let output_len = argon2
        .params()
        .output_len()
        .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let blocks_needed = argon2.params().block_count();
    let mut memory = take_working_memory(blocks_needed);
    let output = Output::init_with(output_len, |out| {
        Ok(argon2.hash_password_into_with_memory(
            password,
            salt,
            out,
            &mut memory[..blocks_needed],
        )?)
    });
    return_working_memory(memory);
    output
}

/// Idle working areas of the default size; never more than there are hashing slots.
static WORKING_MEMORY: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());

fn take_working_memory(blocks: usize) -> Vec<Block> {
    let pooled = WORKING_MEMORY.lock().expect("pool lock").pop();
    match pooled {
        Some(memory) if memory.len() >= blocks => memory,
        _ => vec![Block::default(); blocks],
    }
}

fn return_working_memory(memory: Vec<Block>) {
    // Only areas of the default size are kept: an old hash with bigger parameters
    // must not pin its memory for good.
    if memory.len() == Params::default().block_count() {
        WORKING_MEMORY.lock().expect("pool lock").push(memory);
    }
}

/// Computes the dummy hash ahead of the first login of an unknown user, which would
/// otherwise pay for it and so take twice as long as any other failed login.
pub async fn prepare() -> Result<(), Error> {
    tokio::task::spawn_blocking(|| dummy_hash().map(drop)).await?
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

    async fn hash(password: String) -> Result<String, Error> {
        PasswordHasher::new(64).hash(password).await
    }

    async fn verify(password: String, stored: Option<String>) -> Result<bool, Error> {
        PasswordHasher::new(64).verify(password, stored).await
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    #[allow(unsafe_code)] // reads a thread's niceness, as the code under test sets it
    async fn hashes_run_on_threads_nicer_than_the_ones_serving_requests() {
        // SAFETY: reads the calling thread's niceness.
        let niceness =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let serving = niceness();
        let hashing = PasswordHasher::new(1)
            .with_slot(move || Ok(niceness()))
            .await
            .unwrap();
        assert!(hashing >= HASHING_NICENESS, "{hashing}");
        assert!(
            hashing > serving || serving >= HASHING_NICENESS,
            "{hashing} {serving}"
        );
    }

    #[tokio::test]
    async fn past_its_queue_a_hasher_turns_requests_away_at_once() {
        let hasher = Arc::new(PasswordHasher::new(1));
        let cores = hasher.slots.available_permits();
        let hashes: Vec<_> = (0..cores + 4)
            .map(|_| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash("pass123".into()).await })
            })
            .collect();
        let mut busy = 0;
        for hash in hashes {
            match hash.await.unwrap() {
                Ok(_) => {}
                Err(Error::HashersBusy { retry_after_secs }) => {
                    assert_eq!(retry_after_secs, 1);
                    busy += 1;
                }
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert!(busy >= 1, "nothing was turned away");
        assert!(
            busy <= 3,
            "a slot or the queue place was not used: {busy} turned away"
        );
        assert_eq!(hasher.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_hash_is_argon2id_in_phc_format_and_verifies_only_its_password() {
        let phc = hash("pass123".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify("pass123".into(), Some(phc.clone())).await.unwrap());
        assert!(!verify("pass124".into(), Some(phc)).await.unwrap());
    }

    #[tokio::test]
    async fn hashes_interoperate_with_the_argon2_crates_own_hasher_and_verifier() {
        use argon2::{PasswordHasher, PasswordVerifier};

        let ours = hash("pass123".into()).await.unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"pass123", &parsed)
            .is_ok());
        assert!(Argon2::default()
            .verify_password(b"pass124", &parsed)
            .is_err());

        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"pass123", &salt)
            .unwrap()
            .to_string();
        // Twice: the second run reuses working memory the first left dirty.
        for _ in 0..2 {
            assert!(verify("pass123".into(), Some(theirs.clone()))
                .await
                .unwrap());
            assert!(!verify("pass124".into(), Some(theirs.clone()))
                .await
                .unwrap());
        }
    }

    #[tokio::test]
    async fn a_hash_with_other_parameters_still_verifies() {
        use argon2::PasswordHasher;

        let params = Params::new(8 * 1024, 3, 1, None).unwrap();
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::generate(&mut OsRng);
        let phc = argon2.hash_password(b"pass123", &salt).unwrap().to_string();
        assert!(phc.contains("m=8192,t=3,p=1"), "{phc}");
        assert!(verify("pass123".into(), Some(phc.clone())).await.unwrap());
        assert!(!verify("nope".into(), Some(phc)).await.unwrap());
    }

    #[tokio::test]
    async fn an_unknown_user_never_verifies() {
        assert!(!verify("not anyone's password".into(), None).await.unwrap());
    }
}
