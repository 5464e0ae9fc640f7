{#- `state.apply saltpeter`: the wrapper, which every minion needs. The master host adds
    saltpeter.master in its top file. #}
include:
  - saltpeter.wrapper
