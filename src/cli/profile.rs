//! `petrel profile push|pull`: a recorded profile published next to its image in
//! the registry, as an OCI artifact whose `subject` is the image's manifest, so
//! every node's mounts and snapshotter find it (`petrel mount` looks it up unless
//! `--no-profile-lookup`) without converting the image again.

use crate::cli::mount::read_profile;
use crate::cli::registry_args::RegistryArgs;
use anyhow::{bail, Context};
use petrel_registry::client::referrers::{ANNOTATION_CREATED, PROFILE_ARTIFACT_TYPE};
use petrel_registry::oci::{annotation, bootstrap_layer, descriptor, Descriptor, ANNOTATION_BOOTSTRAP_BLAKE3};
use petrel_registry::{ImageRef, RegistryClient};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    #[command(subcommand)]
    command: ProfileCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ProfileCommand {
    /// Publish a profile for a petrel image in its registry (an OCI referrer of the
    /// image for this machine's platform).
    Push {
        /// The petrel image: `docker://HOST/REPO:TAG` or `@sha256:…`.
        image: String,
        /// The profile (`petrel record --profile`).
        profile: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Print the newest profile published for an image (JSON), or write it to a file.
    Pull {
        image: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

pub use petrel_registry::oci::now_rfc3339;

/// The client, reference and this platform's manifest (descriptor and bootstrap
/// digest) of a registry image.
fn resolve(
    image: &str,
    registry: &RegistryArgs,
) -> anyhow::Result<(RegistryClient, ImageRef, Descriptor, Option<String>)> {
    let Some(reference) = image.strip_prefix("docker://") else {
        bail!("{image}: profiles are published in a registry: give docker://HOST/REPO:TAG");
    };
    let image_ref = ImageRef::parse(reference)?;
    let client = RegistryClient::new(&image_ref.registry, &registry.client_options()?)?;
    let (manifest, digest) = client
        .get_image_manifest(
            &image_ref.repository,
            image_ref.reference(),
            &petrel_registry::oci::host_platform(),
        )
        .with_context(|| format!("resolving {image}"))?;
    let Some(bootstrap) = bootstrap_layer(&manifest) else {
        bail!("{image} is not a petrel image (its manifest has no bootstrap layer)");
    };
    let bootstrap_digest = annotation(bootstrap, ANNOTATION_BOOTSTRAP_BLAKE3).map(str::to_string);
    let (bytes, media_type, _) = client.get_manifest(&image_ref.repository, &digest)?;
    let subject = descriptor(&media_type, &digest, bytes.len() as u64)?;
    Ok((client, image_ref, subject, bootstrap_digest))
}

pub fn run_profile(args: ProfileArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ProfileCommand::Push {
            image,
            profile,
            registry,
        } => {
            let mut parsed = read_profile(&profile)?;
            let (client, image_ref, subject, bootstrap_digest) = resolve(&image, &registry)?;
            match (&parsed.image, &bootstrap_digest) {
                (Some(recorded), Some(actual)) if recorded != actual => {
                    bail!(
                        "{} was recorded on another image (bootstrap {recorded}, this one is {actual})",
                        profile.display()
                    )
                }
                (None, Some(actual)) => parsed.image = Some(actual.clone()),
                _ => {}
            }
            let content = serde_json::to_vec(&parsed)?;
            let annotations = [(ANNOTATION_CREATED.to_string(), now_rfc3339())].into();
            let digest = client.push_referrer(
                &image_ref.repository,
                &subject,
                PROFILE_ARTIFACT_TYPE,
                &content,
                annotations,
            )?;
            println!("{digest}");
            eprintln!(
                "published a profile of {} files for {}@{}",
                parsed.entries.len(),
                image_ref.repository,
                subject.digest()
            );
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Pull {
            image,
            output,
            registry,
        } => {
            let (client, image_ref, subject, _) = resolve(&image, &registry)?;
            let Some(found) =
                client.newest_referrer(&image_ref.repository, subject.digest().as_ref(), PROFILE_ARTIFACT_TYPE)?
            else {
                eprintln!("no profile is published for {image}");
                return Ok(ExitCode::from(1));
            };
            let (_, content) = client.artifact_content(
                &image_ref.repository,
                found.digest().as_ref(),
                petrel_fuse_daemon::profile_prefetch::MAX_PROFILE_BYTES,
            )?;
            let parsed = petrel_format::profile::Profile::parse(&content)
                .map_err(|e| anyhow::anyhow!("profile {}: {e}", found.digest()))?;
            let text = serde_json::to_string_pretty(&parsed)?;
            match output {
                Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
                None => println!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339() {
        let now = super::now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(
            now.starts_with("20") && now.ends_with('Z') && now.as_bytes()[10] == b'T',
            "{now}"
        );
    }
}
