//! Which live master should hold which job: rendezvous (highest random weight) hashing.
//!
//! Every master computes the same answer from the same list of live masters, with no
//! coordination: a job goes to the master with the highest score for the pair (master, job).
//! Jobs spread evenly, and when a master leaves, only its own jobs move (each to the master
//! with the next-highest score); when one joins, it takes about 1/n of the jobs from the
//! others. The answer is only a preference: the lease decides who actually runs a job, so two
//! masters that briefly disagree about the live list cannot both run it.
//!
//! The hash is FNV-1a followed by a 64-bit finalizer, written out here so that it never
//! changes with a library or compiler version: masters of different builds must agree.

/// The score of `master` for `job`.
fn score(master: &str, job: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // The length first, so that ("ab", "c") and ("a", "bc") hash apart.
    for byte in (master.len() as u64)
        .to_le_bytes()
        .iter()
        .chain(master.as_bytes())
        .chain(job.as_bytes())
    {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(PRIME);
    }
    // The finalizer of splitmix64: FNV's low bits alone spread poorly.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The master that should hold `job` among `masters`, or `None` if there is none. Ties, which
/// need a hash collision, go to the smaller id so that every master agrees.
pub fn owner_of<'m, M: AsRef<str>>(job: &str, masters: &'m [M]) -> Option<&'m M> {
    masters.iter().max_by(|a, b| {
        score(a.as_ref(), job)
            .cmp(&score(b.as_ref(), job))
            .then_with(|| b.as_ref().cmp(a.as_ref()))
    })
}

/// The jobs among `jobs` that `me` should hold, given the live `masters` (which should
/// include `me`) and, for each, the jobs its configuration has (`None`: every job). A job goes
/// to the highest-scoring master that has it, so a job that only some masters' files have yet
/// is never left to one that cannot run it.
pub fn jobs_for<'j>(
    me: &str,
    jobs: impl IntoIterator<Item = &'j str>,
    masters: &[(&str, Option<&std::collections::HashSet<&str>>)],
) -> Vec<&'j str> {
    jobs.into_iter()
        .filter(|job| {
            let able: Vec<&str> = masters
                .iter()
                .filter(|(_, known)| known.is_none_or(|k| k.contains(job)))
                .map(|(id, _)| *id)
                .collect();
            owner_of(job, &able).is_some_and(|m| *m == me)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn a_job_goes_only_to_masters_whose_files_have_it() {
        let jobs = jobs();
        let all: HashSet<&str> = jobs.iter().map(String::as_str).collect();
        // master-b has not loaded the last ten jobs yet; master-c never said (every job).
        let fewer: HashSet<&str> = jobs.iter().take(90).map(String::as_str).collect();
        let masters = [
            ("master-a", Some(&all)),
            ("master-b", Some(&fewer)),
            ("master-c", None),
        ];
        let mut owners: HashMap<&str, &str> = HashMap::new();
        for (me, _) in masters {
            for job in jobs_for(me, jobs.iter().map(String::as_str), &masters) {
                assert!(owners.insert(job, me).is_none(), "{job} has two owners");
            }
        }
        assert_eq!(owners.len(), jobs.len(), "every job has an owner");
        for job in jobs.iter().skip(90) {
            assert_ne!(
                owners[job.as_str()],
                "master-b",
                "{job} went to a master without it"
            );
        }
        // Where every master has the job, the answer is plain rendezvous hashing.
        let ids = ["master-a", "master-b", "master-c"];
        for job in jobs.iter().take(90) {
            assert_eq!(owners[job.as_str()], *owner_of(job, &ids).unwrap());
        }
        // Some of the last ten would have gone to master-b without the check.
        assert!(
            jobs.iter()
                .skip(90)
                .any(|j| *owner_of(j, &ids).unwrap() == "master-b")
        );
    }

    fn jobs() -> Vec<String> {
        (0..100).map(|i| format!("job-{i}")).collect()
    }

    #[test]
    fn spreads_jobs_evenly_and_moves_only_a_leaving_masters_jobs() {
        let masters = ["master-a", "master-b", "master-c"];
        let jobs = jobs();
        let before: HashMap<&str, &str> = jobs
            .iter()
            .map(|j| (j.as_str(), *owner_of(j, &masters).unwrap()))
            .collect();
        for m in masters {
            let n = before.values().filter(|o| **o == m).count();
            // An even share is 33; rendezvous hashing of 100 jobs stays well within 20..47.
            assert!((20..=47).contains(&n), "{m} holds {n} of 100 jobs");
        }
        let left = ["master-a", "master-c"];
        for job in &jobs {
            let now = *owner_of(job, &left).unwrap();
            let was = before[job.as_str()];
            if was != "master-b" {
                assert_eq!(now, was, "{job} moved though its master stayed");
            }
        }
    }

    #[test]
    fn every_master_agrees_and_the_order_of_the_list_does_not_matter() {
        let a = ["m1", "m2", "m3", "m4"];
        let b = ["m3", "m1", "m4", "m2"];
        for job in jobs() {
            assert_eq!(owner_of(&job, &a), owner_of(&job, &b));
        }
        let all_jobs: Vec<(&str, Option<&HashSet<&str>>)> = a.iter().map(|m| (*m, None)).collect();
        let mine: usize = a
            .iter()
            .map(|m| jobs_for(m, jobs().iter().map(String::as_str), &all_jobs).len())
            .sum();
        assert_eq!(mine, 100, "each job goes to exactly one master");
        assert_eq!(owner_of::<&str>("job", &[]), None);
    }

    #[test]
    fn the_hash_is_fixed() {
        // Masters of different builds must agree: this value may never change.
        assert_eq!(score("master-a", "backup"), 7_720_561_978_092_568_350);
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }
}
