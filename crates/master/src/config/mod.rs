//! Job files and master settings: raw YAML in, validated specs out.
