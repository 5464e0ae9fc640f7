{#- sp-master on the Salt master host: the package (from the system's repositories, or the
    release's .deb/.rpm named in pillar saltpeter:master:package_source), its settings from
    pillar saltpeter:master:config when given, and the service, reloaded (SIGHUP) when the
    settings change. #}
{%- from "saltpeter/map.jinja" import saltpeter with context %}
{%- set m = saltpeter.master %}
sp-master-package:
  pkg.installed:
{%- if m.package_source %}
    - sources:
      - {{ m.package }}: {{ m.package_source }}
{%- else %}
    - name: {{ m.package }}
    - version: {{ saltpeter.version }}*
{%- endif %}

{%- if m.config %}
sp-master-config:
  file.serialize:
    - name: /etc/saltpeter/saltpeter.yaml
    - serializer: yaml
    - dataset:
        saltpeter_config: {{ m.config | json }}
    - user: root
    - group: root
    - mode: '0640'
    - require:
      - pkg: sp-master-package
{%- endif %}

sp-master-service:
  service.running:
    - name: {{ m.service }}
    - enable: True
    - reload: True
    - require:
      - pkg: sp-master-package
{%- if m.config %}
    - watch:
      - file: sp-master-config
{%- endif %}
