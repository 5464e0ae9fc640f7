//! Embeds the git commit the binary is built from, for `--version` (see `saltpeter-build`).

fn main() {
    saltpeter_build::embed_git_commit();
}
