//! Options shared by every command that talks to a registry.

use petrel_registry::{ClientOptions, Credentials, RetryPolicy};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Credentials USER:PASSWORD (default: the Docker config's, if any).
    #[arg(long, env = "PETREL_CREDS", hide_env_values = true)]
    creds: Option<String>,
    /// Use plain HTTP (always allowed for localhost and 127.0.0.0/8).
    #[arg(long)]
    plain_http: bool,
    /// Extra CA certificate(s) in PEM, besides the system roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A registry mirror tried first for reads (repeat for several).
    #[arg(long = "mirror")]
    mirrors: Vec<String>,
    /// Attempts per registry request before giving up.
    #[arg(long, default_value_t = 6)]
    retries: u32,
    /// Seconds a registry request may keep retrying before giving up.
    #[arg(long, default_value_t = 60.0)]
    retry_seconds: f64,
}

impl RegistryArgs {
    /// The same options as command-line arguments (for a re-executed daemon; the
    /// credentials travel in the environment, never on the command line).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--retries".to_string(),
            self.retries.to_string(),
            "--retry-seconds".into(),
            self.retry_seconds.to_string(),
        ];
        if self.plain_http {
            args.push("--plain-http".into());
        }
        if let Some(ca) = &self.ca_file {
            args.extend(["--ca-file".into(), ca.display().to_string()]);
        }
        for mirror in &self.mirrors {
            args.extend(["--mirror".into(), mirror.clone()]);
        }
        args
    }

    /// Credentials to hand to a child process through `PETREL_CREDS`.
    pub fn creds(&self) -> Option<&str> {
        self.creds.as_deref()
    }

    pub fn client_options(&self) -> anyhow::Result<ClientOptions> {
        let credentials = match &self.creds {
            Some(text) => Some(Credentials::parse(text).ok_or_else(|| anyhow::anyhow!("--creds takes USER:PASSWORD"))?),
            None => None,
        };
        Ok(ClientOptions {
            plain_http: self.plain_http,
            ca_file: self.ca_file.clone(),
            credentials,
            mirrors: self.mirrors.clone(),
            retry: RetryPolicy {
                max_attempts: self.retries.max(1),
                max_elapsed: Duration::from_secs_f64(self.retry_seconds.max(0.0)),
                ..RetryPolicy::default()
            },
            ..ClientOptions::default()
        })
    }
}
