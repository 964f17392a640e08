//! The stage graph must be acyclic: finding the cycle to report when it is not.

use std::collections::BTreeMap;

use petgraph::graphmap::DiGraphMap;

use super::StageDecl;

/// A cycle among the stages' input references, or `None` when they form a DAG: the stage to report it at
/// (the first by name in the first strongly connected component with more than one stage) and the path
/// from it back to itself.
pub(super) fn find_cycle(stages: &BTreeMap<String, StageDecl>) -> Option<(&str, Vec<&str>)> {
    let mut graph = DiGraphMap::<&str, ()>::new();
    for (name, decl) in stages {
        graph.add_node(name);
        for r in &decl.references.inputs {
            graph.add_edge(r.target.as_str(), name.as_str(), ());
        }
    }
    let scc = petgraph::algo::tarjan_scc(&graph)
        .into_iter()
        .find(|scc| scc.len() >= 2)?;
    let start = *scc.iter().min().expect("non-empty");
    let mut path = shortest_cycle(&graph, start, &scc);
    path.push(start);
    Some((start, path))
}

/// Breadth-first search for the shortest path start -> ... -> start inside one strongly connected component.
fn shortest_cycle<'a>(
    graph: &DiGraphMap<&'a str, ()>,
    start: &'a str,
    scc: &[&'a str],
) -> Vec<&'a str> {
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        let mut next: Vec<_> = graph.neighbors(node).filter(|n| scc.contains(n)).collect();
        next.sort();
        for n in next {
            if n == start {
                let mut path = vec![node];
                while let Some(&p) = prev.get(path.last().expect("non-empty")) {
                    path.push(p);
                }
                path.reverse();
                return path;
            }
            if !prev.contains_key(n) && n != start {
                prev.insert(n, node);
                queue.push_back(n);
            }
        }
    }
    scc.to_vec()
}
