//! Cores: pinning processes, raw Argon2 measured on the server's core, and a process that
//! keeps that core busy.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use argon2::{
    password_hash::{PasswordHasher, SaltString},
    Argon2,
};
use rand::rngs::OsRng;

use crate::{bench_secs, ROLE, SERVER_CORE};

/// A command for `program`, run on the server's core when `pinned`.
pub fn on_server_core(program: impl AsRef<std::ffi::OsStr>, pinned: bool) -> Command {
    if pinned {
        let mut command = Command::new("taskset");
        command.args(["-c", &SERVER_CORE.to_string()]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

pub fn pin(pid: u32, core: usize) {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset (util-linux) is needed to pin processes to cores");
    assert!(status.success(), "taskset failed");
}

/// A copy of this binary in `role` for `duration`, on the server's core when `pinned`.
pub fn this_binary_as(role: &str, pinned: bool, duration: Duration) -> Command {
    let exe = std::env::current_exe().expect("this binary");
    let mut command = on_server_core(exe, pinned);
    command
        .env(ROLE, role)
        .env("BENCH_SECS", duration.as_secs().to_string());
    command
}

/// Hashes per second of one thread, in a copy of this binary pinned to the server's core.
pub fn raw_argon2_rate_on_server_core(pinned: bool, duration: Duration) -> f64 {
    let output = this_binary_as("argon2", pinned, duration)
        .output()
        .expect("run the Argon2 measurement");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a rate")
}

pub fn raw_argon2_rate() {
    let secs = bench_secs(5);
    let argon2 = Argon2::default();
    let start = Instant::now();
    let mut hashes = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let salt = SaltString::generate(&mut OsRng);
        argon2
            .hash_password(b"bench-password", &salt)
            .expect("hash");
        hashes += 1;
    }
    println!("{}", hashes as f64 / start.elapsed().as_secs_f64());
}

/// A copy of this binary spinning on the server's core at normal priority, until dropped.
pub struct CoreSpinner(Child);

impl CoreSpinner {
    pub fn start(measured: Duration) -> Self {
        let child = this_binary_as("spin", true, measured)
            .spawn()
            .expect("start the spinner");
        Self(child)
    }
}

impl Drop for CoreSpinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Keeps a core busy for a minute more than the measured time at most, so it ends even if
/// the benchmark is killed.
pub fn spin() {
    let secs = bench_secs(10);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs + 60) {
        std::hint::black_box(0u64);
    }
}
