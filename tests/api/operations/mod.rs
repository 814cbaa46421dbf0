//! What operators use: the command line (`migrate`, `user create|list|grant|disable|enable`),
//! readiness, metrics, request ids in 500s, JSON logs and the model probe at start-up.

use std::process::Output;

use crate::server::Server;

mod command_line;
mod logs;
mod readiness_and_metrics;

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    run_with(dir, &[], args)
}

/// `tokenchat ARGS` in `dir` with the variables `vars`.
pub(crate) fn run_with(dir: &std::path::Path, vars: &[(&str, &str)], args: &[&str]) -> Output {
    Server::command(dir, vars).args(args).output().unwrap()
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
