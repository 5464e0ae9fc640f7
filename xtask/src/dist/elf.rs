//! The ELF check of what `cargo xtask dist` built, read with the `object` crate: the machine
//! (x86_64 or aarch64), the dynamic loader, whether the binary is stripped, and the newest glibc
//! symbol version any undefined dynamic symbol needs (from `.gnu.version` and `.gnu.version_r`).
//! A binary that needs `GLIBC_2.18` or later fails here rather than on a CentOS 7 minion.

use anyhow::{Context, Result, bail};
use object::elf::{self, FileHeader64};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym};
use object::{Endianness, SymbolIndex};

/// The oldest glibc the release binaries must run on (CentOS 7, RHEL 7, Debian 8).
pub const GLIBC_FLOOR: Glibc = Glibc(2, 17, 0);

/// A glibc symbol version such as `GLIBC_2.17` (major, minor, patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Glibc(pub u32, pub u32, pub u32);

impl std::fmt::Display for Glibc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.2 {
            0 => write!(f, "{}.{}", self.0, self.1),
            p => write!(f, "{}.{}.{p}", self.0, self.1),
        }
    }
}

/// `GLIBC_2.17` → 2.17; `GLIBC_PRIVATE` and other names are not versions.
pub fn parse_glibc(name: &str) -> Option<Glibc> {
    let mut parts = name.strip_prefix("GLIBC_")?.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = match parts.next() {
        Some(p) => p.parse().ok()?,
        None => 0,
    };
    parts.next().is_none().then_some(Glibc(major, minor, patch))
}

/// What the check found in one binary.
#[derive(Debug)]
pub struct Report {
    /// `x86_64` or `aarch64` (other machines are an error).
    pub arch: &'static str,
    /// `PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`; `None` for a static binary.
    pub interpreter: Option<String>,
    /// Whether the binary has no `.symtab` (and no debug sections).
    pub stripped: bool,
    /// The newest glibc version an undefined dynamic symbol needs, with those symbols.
    pub newest_glibc: Option<(Glibc, Vec<String>)>,
    /// Every `GLIBC_*` version `.gnu.version_r` lists.
    pub needed: Vec<Glibc>,
}

/// Reads `data` as a 64-bit little-endian ELF executable.
pub fn inspect(data: &[u8]) -> Result<Report> {
    let header = FileHeader64::<Endianness>::parse(data).context("not a 64-bit ELF file")?;
    let endian = header.endian().context("ELF byte order")?;
    if header.e_ident().data != elf::ELFDATA2LSB {
        bail!("not a little-endian ELF file");
    }
    let arch = match header.e_machine(endian) {
        elf::EM_X86_64 => "x86_64",
        elf::EM_AARCH64 => "aarch64",
        other => bail!("unexpected ELF machine {other}"),
    };
    let mut interpreter = None;
    for ph in header.program_headers(endian, data)? {
        if let Some(bytes) = ph.interpreter(endian, data)? {
            interpreter = Some(String::from_utf8_lossy(bytes).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    // `.debug_gdb_scripts` is not debug information but a loaded section naming rustc's
    // pretty-printers for gdb; stripping keeps it.
    let stripped = sections.iter().all(|s| {
        let name = sections.section_name(endian, s).unwrap_or_default();
        s.sh_type(endian) != elf::SHT_SYMTAB
            && (!name.starts_with(b".debug_") || name == b".debug_gdb_scripts")
    });
    let mut needed = Vec::new();
    if let Some((mut needs, strings_index)) = sections.gnu_verneed(endian, data)? {
        let strings = sections.strings(endian, data, strings_index)?;
        while let Some((_, mut aux)) = needs.next()? {
            while let Some(a) = aux.next()? {
                let name = String::from_utf8_lossy(a.name(endian, strings)?).into_owned();
                if let Some(v) = parse_glibc(&name) {
                    needed.push(v);
                }
            }
        }
    }
    needed.sort();
    needed.dedup();
    let mut newest: Option<(Glibc, Vec<String>)> = None;
    let dynsym = sections.symbols(endian, data, elf::SHT_DYNSYM)?;
    if let Some(versions) = sections.versions(endian, data)? {
        for (i, sym) in dynsym.symbols().iter().enumerate() {
            // A defined symbol with a version is one this binary exports, not one it needs.
            if !sym.is_undefined(endian) {
                continue;
            }
            let index = versions.version_index(endian, SymbolIndex(i));
            let Some(version) = versions.version(index)? else {
                continue;
            };
            let Some(v) = parse_glibc(&String::from_utf8_lossy(version.name())) else {
                continue;
            };
            let name = String::from_utf8_lossy(sym.name(endian, dynsym.strings())?).into_owned();
            match &mut newest {
                Some((n, names)) if *n == v => names.push(name),
                Some((n, _)) if *n > v => {}
                _ => newest = Some((v, vec![name])),
            }
        }
    }
    Ok(Report {
        arch,
        interpreter,
        stripped,
        newest_glibc: newest,
        needed,
    })
}

/// Fails unless `report` is a stripped, dynamically linked `arch` binary whose every glibc need
/// is at most [`GLIBC_FLOOR`]. Returns a one-line summary.
pub fn check(report: &Report, arch: &str) -> Result<String> {
    if report.arch != arch {
        bail!("built for {}, expected {arch}", report.arch);
    }
    if !report.stripped {
        bail!("not stripped (a .symtab or .debug_* section is left)");
    }
    let Some(interp) = &report.interpreter else {
        bail!("statically linked; the release links glibc dynamically (NSS for the user switch)");
    };
    if let Some(too_new) = report.needed.iter().find(|v| **v > GLIBC_FLOOR) {
        let symbols = match &report.newest_glibc {
            Some((v, names)) if *v > GLIBC_FLOOR => names.join(", "),
            _ => "(no symbol names it)".to_owned(),
        };
        bail!("needs GLIBC_{too_new}, newer than {GLIBC_FLOOR}: {symbols}");
    }
    let newest = report
        .newest_glibc
        .as_ref()
        .map_or("none".to_owned(), |(v, names)| {
            format!("GLIBC_{v} ({} symbol(s), e.g. {})", names.len(), names[0])
        });
    Ok(format!(
        "{arch}, stripped, loader {interp}, newest glibc need {newest}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_versions_parse_and_order() {
        assert_eq!(parse_glibc("GLIBC_2.17"), Some(Glibc(2, 17, 0)));
        assert_eq!(parse_glibc("GLIBC_2.2.5"), Some(Glibc(2, 2, 5)));
        assert_eq!(parse_glibc("GLIBC_PRIVATE"), None);
        assert_eq!(parse_glibc("GCC_3.0"), None);
        assert!(Glibc(2, 2, 5) < GLIBC_FLOOR && Glibc(2, 18, 0) > GLIBC_FLOOR);
        assert!(Glibc(2, 17, 1) > GLIBC_FLOOR);
    }

    /// The xtask binary itself is a glibc-linked ELF of this host: the reader must find its
    /// machine, its loader and at least the baseline `GLIBC_2.2.5`/`GLIBC_2.17` needs.
    #[test]
    fn reads_this_hosts_own_binary() {
        let exe = std::env::current_exe().expect("current exe");
        let data = std::fs::read(exe).expect("read exe");
        let report = inspect(&data).expect("inspect");
        assert_eq!(report.arch, std::env::consts::ARCH);
        assert!(report.interpreter.is_some());
        assert!(!report.needed.is_empty(), "{report:?}");
        assert!(report.newest_glibc.is_some());
    }
}
