//! The shipped config files of both daemons, corrupted or cut short at random, parse to a config
//! or to a clear error, never a panic.

use std::path::Path;

use ferry_cloud::CloudConfig;
use ferry_edge::EdgeConfig;
use ferry_integration::repo_root;
use proptest::prelude::*;

/// A config file and whether its daemon's parser accepts a text.
type Parser = (&'static str, fn(&str) -> bool);

/// Characters that matter to TOML, so the corruption reaches past the first syntax error.
fn toml_char() -> impl Strategy<Value = char> {
    proptest::sample::select("\"=[]\n-.09e#xtf ,{}'".chars().collect::<Vec<_>>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn corrupted_configs_never_panic(
        edits in proptest::collection::vec((any::<usize>(), toml_char()), 1..6),
        cut in any::<usize>(),
    ) {
        let parsers: [Parser; 2] = [
            ("configs/edge.toml", |t| EdgeConfig::from_toml(t, Path::new("corrupt.toml")).is_ok()),
            ("configs/cloud.toml", |t| CloudConfig::from_toml(t, Path::new("corrupt.toml")).is_ok()),
        ];
        for (file, parses) in parsers {
            let mut chars: Vec<char> =
                std::fs::read_to_string(repo_root().join(file)).unwrap().chars().collect();
            prop_assert!(parses(&chars.iter().collect::<String>()), "{file} as shipped");
            for &(at, c) in &edits {
                let n = chars.len();
                chars[at % n] = c;
            }
            let cut = cut % (chars.len() + 1);
            parses(&chars.iter().collect::<String>());
            parses(&chars[..cut].iter().collect::<String>());
        }
    }
}
