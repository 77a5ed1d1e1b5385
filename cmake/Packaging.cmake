# Packaging.cmake: what `cmake --install` lays out and the Debian package CPack builds from it
# (`cpack -G DEB` in the build directory; tests/package/package_test.sh installs and checks it).
#
#   /usr/bin/tvillingd, /usr/bin/tvillingctl
#   /usr/lib/systemd/system/tvillingd.service          not enabled or started on install
#   /usr/share/man/man8/tvillingd.8.gz, man1/tvillingctl.1.gz   generated from --help (help2man)
#   /usr/share/doc/tvilling/                            operations, configuration, tvillingctl docs
#   /usr/share/doc/tvilling/examples/                   example configs
#   /usr/share/tvilling/make-dev-pki.sh                 the development PKI script
#   /usr/share/tvilling/prometheus, grafana             alert rules and dashboard
#   /usr/share/bash-completion/completions/tvillingctl  bash completion
# postinst creates the system user `tvilling`, /var/lib/tvilling (0750) and /etc/tvilling.
include(GNUInstallDirs)

install(TARGETS tvillingd tvillingctl RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(FILES ${PROJECT_SOURCE_DIR}/deploy/systemd/tvillingd.service
  DESTINATION lib/systemd/system)
install(FILES ${PROJECT_SOURCE_DIR}/docs/operations.md ${PROJECT_SOURCE_DIR}/docs/configuration.md
  ${PROJECT_SOURCE_DIR}/docs/tvillingctl.md ${PROJECT_SOURCE_DIR}/docs/replication.md
  DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/deploy/examples/
  DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples)
install(PROGRAMS ${PROJECT_SOURCE_DIR}/deploy/pki/make-dev-pki.sh
  DESTINATION ${CMAKE_INSTALL_DATADIR}/tvilling)
install(FILES ${PROJECT_SOURCE_DIR}/deploy/pki/README.md
  DESTINATION ${CMAKE_INSTALL_DATADIR}/tvilling RENAME README.pki.md)
install(FILES ${PROJECT_SOURCE_DIR}/deploy/prometheus/tvilling.rules.yml
  DESTINATION ${CMAKE_INSTALL_DATADIR}/tvilling/prometheus)
install(FILES ${PROJECT_SOURCE_DIR}/deploy/grafana/tvilling.json
  DESTINATION ${CMAKE_INSTALL_DATADIR}/tvilling/grafana)
install(FILES ${PROJECT_SOURCE_DIR}/deploy/bash-completion/tvillingctl
  DESTINATION ${CMAKE_INSTALL_DATADIR}/bash-completion/completions)

# Man pages from the binaries' own --help and --version, plus the sections in deploy/man/*.h2m.
find_program(HELP2MAN help2man)
find_program(GZIP gzip REQUIRED)
if(HELP2MAN)
  set(man_dir ${PROJECT_BINARY_DIR}/man)
  add_custom_command(OUTPUT ${man_dir}/tvillingd.8.gz
    COMMAND ${CMAKE_COMMAND} -E make_directory ${man_dir}
    COMMAND ${HELP2MAN} --no-info --no-discard-stderr --section 8
      --name "tvilling agent: mirrors block volumes between datacenters"
      --include ${PROJECT_SOURCE_DIR}/deploy/man/tvillingd.h2m
      --output ${man_dir}/tvillingd.8 $<TARGET_FILE:tvillingd>
    COMMAND ${GZIP} -9nf ${man_dir}/tvillingd.8
    DEPENDS tvillingd ${PROJECT_SOURCE_DIR}/deploy/man/tvillingd.h2m
    COMMENT "help2man: tvillingd.8" VERBATIM)
  add_custom_command(OUTPUT ${man_dir}/tvillingctl.1.gz
    COMMAND ${CMAKE_COMMAND} -E make_directory ${man_dir}
    COMMAND ${HELP2MAN} --no-info --no-discard-stderr --section 1
      --name "the operator's CLI of tvilling"
      --version-string "tvillingctl ${PROJECT_VERSION}"
      --include ${PROJECT_SOURCE_DIR}/deploy/man/tvillingctl.h2m
      --output ${man_dir}/tvillingctl.1 $<TARGET_FILE:tvillingctl>
    COMMAND ${GZIP} -9nf ${man_dir}/tvillingctl.1
    DEPENDS tvillingctl ${PROJECT_SOURCE_DIR}/deploy/man/tvillingctl.h2m
    COMMENT "help2man: tvillingctl.1" VERBATIM)
  add_custom_target(man_pages ALL DEPENDS ${man_dir}/tvillingd.8.gz ${man_dir}/tvillingctl.1.gz)
  install(FILES ${man_dir}/tvillingd.8.gz DESTINATION ${CMAKE_INSTALL_MANDIR}/man8)
  install(FILES ${man_dir}/tvillingctl.1.gz DESTINATION ${CMAKE_INSTALL_MANDIR}/man1)
else()
  message(WARNING "help2man not found: the package will have no man pages (apt-get install help2man)")
endif()

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME tvilling)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "tvilling maintainers <tvilling@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "block volume mirroring between datacenters")
set(CPACK_PACKAGE_DESCRIPTION "tvillingd serves block volumes over NBD, orders every write in a \
group log (RocksDB) and streams it over gRPC with mutual TLS to replica sites, in sync or async \
mode. tvillingctl is its operator CLI. The package installs the systemd unit (not enabled), man \
pages, example configs, the development PKI script, Prometheus alert rules and a Grafana \
dashboard.")
# The binaries are stripped; the build tree keeps the debug info.
set(CPACK_STRIP_FILES TRUE)
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_ARCHITECTURE amd64)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
  ${PROJECT_SOURCE_DIR}/deploy/debian/postinst
  ${PROJECT_SOURCE_DIR}/deploy/debian/prerm
  ${PROJECT_SOURCE_DIR}/deploy/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION TRUE)
include(CPack)
