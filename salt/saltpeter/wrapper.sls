{#- sp-wrapper for this minion's architecture, at the version the pillar pins, from the Salt
    master's file server (or the https URL in pillar saltpeter:source), checked against the
    release's SHA256SUMS. Applying it again changes nothing. #}
{%- from "saltpeter/map.jinja" import saltpeter with context %}
{%- set base = saltpeter.source ~ '/' ~ saltpeter.version %}
{%- set path = saltpeter.wrapper.path %}
{%- if not saltpeter.arch %}
sp-wrapper-architecture:
  test.fail_without_changes:
    - name: "No sp-wrapper build for cpuarch {{ grains.get('cpuarch') }} / osarch {{ grains.get('osarch') }}; saltpeter ships x86_64 and aarch64."
{%- else %}
{#- The expected hash, from the release's SHA256SUMS line for this architecture. #}
{%- set sums = salt['cp.get_file_str'](base ~ '/SHA256SUMS') or '' %}
{%- set ns = namespace(expected='') %}
{%- for line in sums.splitlines() %}
{%-   set fields = line.split() %}
{%-   if fields|length == 2 and fields[1].lstrip('*') == saltpeter.arch ~ '/sp-wrapper' %}
{%-     set ns.expected = fields[0] %}
{%-   endif %}
{%- endfor %}
{%- if not ns.expected %}
sp-wrapper-checksum:
  test.fail_without_changes:
    - name: "{{ base }}/SHA256SUMS has no line for {{ saltpeter.arch }}/sp-wrapper"
{%- else %}
sp-wrapper:
  file.managed:
    - name: {{ path }}
    - source: {{ base }}/{{ saltpeter.arch }}/sp-wrapper
    # Enforced by Salt for http(s) sources; a salt:// source is checked by the state below.
    - source_hash: {{ base }}/SHA256SUMS
    - source_hash_name: {{ saltpeter.arch }}/sp-wrapper
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True

{#- Salt compares salt:// files with the file server's own hash, not with source_hash, so the
    installed file is checked against SHA256SUMS here. It only runs (and fails) on a mismatch:
    a matching file is "unless condition is true", no change. #}
sp-wrapper-checksum:
  cmd.run:
    - name: echo "{{ path }} does not match {{ base }}/SHA256SUMS ({{ ns.expected }})" >&2; exit 1
    - unless: echo "{{ ns.expected }}  {{ path }}" | sha256sum -c --status
    - require:
      - file: sp-wrapper
{%- endif %}

sp-wrapper-logdir:
  file.directory:
    - name: {{ saltpeter.wrapper.logdir }}
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
{%- endif %}
