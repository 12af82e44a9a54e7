//! A profile given at mount or found in a registry comes from anywhere: it is planned
//! into prefetch ranges within bounds (patterns with too many wildcards refused,
//! names the image lacks skipped, ranges past a file's end clamped), and in
//! first-access order, a wave at a time.

use petrel_builder::{build_paths, BuildOptions};
use petrel_fixtures::rng::Rng;
use petrel_format::profile::Profile;
use petrel_fuse_daemon::image::MappedImage;
use petrel_fuse_daemon::profile_prefetch::plan;

fn image() -> (tempfile::TempDir, MappedImage) {
    let dir = tempfile::tempdir().unwrap();
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    for i in 0..6 {
        w.file(
            &format!("app/m{i}.bin"),
            &Default::default(),
            &Rng::new(i).bytes(1 << 20),
        );
    }
    w.file("etc/conf", &Default::default(), b"x = 1\n");
    let paths = petrel_fixtures::write_layer_files(&dir.path().join("layers"), &[w.finish()]).unwrap();
    let out = dir.path().join("image");
    build_paths(
        &paths,
        &out,
        BuildOptions {
            chunker: "fixed:256K".parse().unwrap(),
            ..BuildOptions::default()
        },
    )
    .unwrap();
    let image = MappedImage::open(&out.join("bootstrap"), &dir.path().join("cache"), "test").unwrap();
    (dir, image)
}

fn chunks(ranges: &[(u32, u32)]) -> usize {
    ranges.iter().map(|(a, b)| (b - a) as usize).sum()
}

#[test]
fn a_strangers_profile_is_planned_within_bounds() {
    let (_dir, image) = image();
    let profile = Profile::parse(
        br#"{"petrel_profile": 1, "entries": [
            {"path": "app/m3.bin", "ranges": [[0, 300000], [900000, 99999999999]]},
            {"path": "/etc"},
            {"path": "**/**/**/**/**/m1.bin"},
            {"path": "no/such/file"},
            {"path": "app/m?.bin", "ranges": [[5, 4]]}]}"#,
    )
    .unwrap();
    let planned = plan(&image, &profile);
    // m3: [0, 300000) is two 256 KiB chunks, [900000, end) clamped to the last one;
    // etc/conf one chunk; the glob `app/m?.bin` then adds every m file whole.
    assert_eq!(planned.skipped, 2, "the five-wildcard pattern and the missing path");
    assert_eq!(planned.files, 7);
    assert_eq!(chunks(&planned.ranges), 6 * 4 + 1, "{:?}", planned.ranges);

    let first_wave = plan(
        &image,
        &Profile::parse(br#"{"petrel_profile": 1, "entries": [{"path": "app/m3.bin", "ranges": [[0, 300000], [900000, 99999999999]]}]}"#)
            .unwrap(),
    );
    assert_eq!(chunks(&first_wave.ranges), 3, "{:?}", first_wave.ranges);
}

#[test]
fn a_profile_naming_the_root_again_and_again_costs_a_bounded_amount() {
    let (_dir, image) = image();
    let entries: Vec<String> = (0..200_000).map(|_| r#"{"path": "/"}"#.to_string()).collect();
    let text = format!(r#"{{"petrel_profile": 1, "entries": [{}]}}"#, entries.join(","));
    let started = std::time::Instant::now();
    let planned = plan(&image, &Profile::parse(text.as_bytes()).unwrap());
    assert_eq!(planned.files, 7, "every file once");
    assert_eq!(chunks(&planned.ranges), 6 * 4 + 1);
    assert_eq!(planned.skipped, 200_000 - 64, "expansions beyond the bound are skipped");
    // Not a timing assertion on speed: a guard against a pass per entry over the tree.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn profile_order_leads_and_a_wave_is_merged_in_blob_order() {
    let (_dir, image) = image();
    // Six 1 MiB files of random bytes (four 256 KiB chunks each, stored at their size),
    // first accessed from m5 down to m0.
    let profile = Profile::parse(
        br#"{"petrel_profile": 1, "entries": [
            {"path": "app/m5.bin"}, {"path": "app/m4.bin"}, {"path": "app/m3.bin"},
            {"path": "app/m2.bin"}, {"path": "app/m1.bin"}, {"path": "app/m0.bin"}]}"#,
    )
    .unwrap();
    let planned = plan(&image, &profile);
    assert_eq!(chunks(&planned.ranges), 24);
    // m5..m2 (4 MiB) make the first wave: one range merged in blob order. m1 and m0,
    // earlier in the blob, follow as the second wave.
    let first = planned.ranges[0];
    let m2_first_chunk = planned.ranges.iter().map(|r| r.0).min().unwrap();
    assert!(planned.ranges.len() <= 3, "{:?}", planned.ranges);
    assert!(
        first.1 - first.0 >= 16,
        "the first wave is one merged range: {:?}",
        planned.ranges
    );
    assert!(
        first.0 > m2_first_chunk,
        "m1 and m0 come after the first wave: {:?}",
        planned.ranges
    );
}
