//! Running unmodified Python clients (boto3, botocore) against iamlet: the interpreter from
//! the workspace's `.venv` if present, else `python3` from `$PATH`.

use crate::process::{Output, run_bounded};
use crate::util::workspace_root;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Bound on one `run_python` call.
pub const PYTHON_TIMEOUT: Duration = Duration::from_secs(60);

/// `<workspace>/.venv/bin/python3` if it exists, else `python3`.
pub fn python() -> PathBuf {
    let venv = workspace_root().join(".venv/bin/python3");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// `aws sts get-caller-identity --query Arn --output text` with the AWS CLI of the
/// workspace's `.venv` (the caller adds the environment).
pub fn aws_caller_arn() -> Command {
    let mut cmd = Command::new(workspace_root().join(".venv/bin/aws"));
    cmd.args([
        "sts",
        "get-caller-identity",
        "--query",
        "Arn",
        "--output",
        "text",
    ]);
    cmd
}

/// Runs `python -c script` (at most 60 s, killed on timeout) with `envs` added. With
/// `env_clear_aws`, every `AWS_*` variable inherited from the test process is removed first,
/// so the script sees only what `envs` sets.
pub fn run_python(script: &str, envs: &[(&str, &str)], env_clear_aws: bool) -> Output {
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(script);
    if env_clear_aws {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
    }
    cmd.envs(envs.iter().copied());
    run_bounded(cmd, PYTHON_TIMEOUT)
}
