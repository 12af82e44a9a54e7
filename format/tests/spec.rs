//! format-spec.md and the code agree on every record size.

use petrel_format::layout::*;

#[test]
fn record_sizes_match_the_spec() {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../format-spec.md")).unwrap();
    let table = spec.split("## 15. Record sizes").nth(1).expect("record size table");
    let sizes: std::collections::HashMap<&str, usize> = table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
            match cells.as_slice() {
                [name, size] => size.parse().ok().map(|s| (*name, s)),
                _ => None,
            }
        })
        .collect();
    let code = [
        ("SuperblockRecord", size_of::<SuperblockRecord>()),
        ("SectionRecord", size_of::<SectionRecord>()),
        ("InodeRecord", size_of::<InodeRecord>()),
        ("DirentRecord", size_of::<DirentRecord>()),
        ("ChunkRefRecord", size_of::<ChunkRefRecord>()),
        ("ChunkRecord", size_of::<ChunkRecord>()),
        ("BlobRecord", size_of::<BlobRecord>()),
        ("XattrRecord", size_of::<XattrRecord>()),
        ("PrefetchRecord", size_of::<PrefetchRecord>()),
    ];
    assert_eq!(sizes.len(), code.len(), "spec lists {sizes:?}");
    for (name, size) in code {
        assert_eq!(sizes.get(name), Some(&size), "{name}");
    }
    for section in Section::ALL {
        assert!(spec.contains(&format!("× {} B", section.record_size())) || section == Section::Strings);
    }
}
