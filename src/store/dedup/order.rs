//! The one order of a tree, and the path rules that follow from it.
//!
//! A tree is a flat list sorted by path components (`uploads/a`, `uploads/a/b`,
//! `uploads/a.txt`: the order `walkdir`'s `sort_by_file_name` walks in). Because every
//! entry must sort strictly after the one before, duplicates are impossible, and a folder's
//! content comes right after it: a stack of the open folders is all it takes to check that
//! every ancestor is a folder (never a file or a symlink) in memory that grows with the
//! depth, not the number of entries. A flat list has no references between entries, so
//! there are no cycles to chase.

use std::cmp::Ordering;

use super::format::TreeKind;

/// Compare two paths component by component.
pub fn cmp_components(a: &[Vec<u8>], b: &[Vec<u8>]) -> Ordering {
    a.iter().cmp(b.iter())
}

#[derive(Default, Clone)]
pub struct TreeOrder {
    last: Option<Vec<Vec<u8>>>,
    /// Folders that are ancestors of the last entry (or the last entry itself), shallowest first.
    open_dirs: Vec<Vec<Vec<u8>>>,
}

impl TreeOrder {
    /// Check the next entry. `parts` come from `archive::entry_path` (no `..`, no empty
    /// components, a known top-level folder).
    pub fn next(&mut self, parts: &[Vec<u8>], kind: TreeKind) -> Result<(), String> {
        let shown = crate::manifest::escape_path(&parts.join(&b'/'));
        if parts.len() == 1 && parts[0] == crate::manifest::INNER_MANIFEST.as_bytes() {
            return Err(format!("{shown} is no tree entry"));
        }
        if let Some(last) = &self.last {
            match cmp_components(parts, last) {
                Ordering::Greater => {}
                Ordering::Equal => return Err(format!("{shown} appears twice")),
                Ordering::Less => {
                    return Err(format!("{shown} is out of order (duplicate or reordered entries)"))
                }
            }
        }
        while self.open_dirs.last().is_some_and(|d| !parts.starts_with(d)) {
            self.open_dirs.pop();
        }
        // Every ancestor below the top-level folder must be a folder of this tree.
        let needed = parts.len().saturating_sub(2);
        let present = self.open_dirs.iter().filter(|d| d.len() >= 2).count();
        if present != needed {
            return Err(format!("{shown} lies below something that is not a folder of this snapshot"));
        }
        let top = parts[0].as_slice();
        if parts.len() == 1 && kind != TreeKind::Dir {
            return Err(format!("top-level entry {shown} is not a folder"));
        }
        if top == crate::archive::TOP_DB.as_bytes() && !(parts.len() == 2 && kind == TreeKind::File) {
            return Err(format!("unexpected database entry {shown}"));
        }
        if kind == TreeKind::Symlink && top != crate::archive::TOP_UPLOADS.as_bytes() {
            return Err(format!("symlink outside uploads {shown}"));
        }
        if kind == TreeKind::Dir {
            self.open_dirs.push(parts.to_vec());
        }
        self.last = Some(parts.to_vec());
        Ok(())
    }

    /// The folders a new entry needs and that were not added (deepest last), so that a
    /// writer can add them rather than produce a tree its reader refuses.
    pub fn missing_ancestors(&mut self, parts: &[Vec<u8>]) -> Vec<Vec<Vec<u8>>> {
        while self.open_dirs.last().is_some_and(|d| !parts.starts_with(d)) {
            self.open_dirs.pop();
        }
        (2..parts.len()).map(|n| parts[..n].to_vec()).filter(|anc| !self.open_dirs.contains(anc)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<Vec<u8>> {
        crate::archive::entry_path(s.as_bytes()).unwrap()
    }

    #[test]
    fn walk_order_passes_and_tricks_fail() {
        let mut o = TreeOrder::default();
        for (path, kind) in [
            ("db/app.db", TreeKind::File),
            ("uploads", TreeKind::Dir),
            ("uploads/a", TreeKind::Dir),
            ("uploads/a/b", TreeKind::File),
            ("uploads/a.txt", TreeKind::File),
            ("uploads/l", TreeKind::Symlink),
        ] {
            o.next(&p(path), kind).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        let bad = |prefix: &[(&str, TreeKind)], path: &str, kind: TreeKind| {
            let mut o = TreeOrder::default();
            for (q, k) in prefix {
                o.next(&p(q), *k).unwrap();
            }
            o.next(&p(path), kind).unwrap_err()
        };
        let up = ("uploads", TreeKind::Dir);
        assert!(bad(&[up], "uploads", TreeKind::Dir).contains("twice"));
        assert!(bad(&[up, ("uploads/b", TreeKind::File)], "uploads/a", TreeKind::File).contains("order"));
        assert!(bad(&[up, ("uploads/l", TreeKind::Symlink)], "uploads/l/x", TreeKind::File).contains("below"));
        assert!(bad(&[up, ("uploads/f", TreeKind::File)], "uploads/f/x", TreeKind::File).contains("below"));
        assert!(bad(&[up], "uploads/a/b", TreeKind::File).contains("below"));
        assert!(bad(&[], "db/x", TreeKind::Dir).contains("database"));
        assert!(bad(&[], "raw/l", TreeKind::Symlink).contains("symlink"));
        assert!(bad(&[], "uploads", TreeKind::File).contains("top-level"));
        let mut o = TreeOrder::default();
        o.next(&p("uploads"), TreeKind::Dir).unwrap();
        assert_eq!(o.missing_ancestors(&p("uploads/a/b/c")), vec![p("uploads/a"), p("uploads/a/b")]);
    }
}
